"""The store's layout record: what every stored log is read against, one per store.

A log record's ``action`` is an index into the *store's* action vocabulary, not into a model's:
the names in index order, append-only, kept in the store beside the logs. A model maps its own
action list onto it by name when it is loaded, so a model whose list is reordered or extended
reads every stored event as the action it was. The record also holds the store's
``max_history``: logs are trimmed to that window, so every worker and model version serving
the store must use the same one.

:func:`reconcile` is the one rule; each store applies it atomically (a worker and a rollout on
another replica may reconcile at the same moment). A model it refuses leaves the record as it
was, so a refused model's new names never bind the models after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson


class LayoutMismatch(ValueError):
    """A model or worker would misread the store's logs; the message says what differs."""


@dataclass(frozen=True)
class StoreLayout:
    actions: tuple[str, ...]
    """The store's action vocabulary: a stored action index ``i`` means ``actions[i]``."""
    max_history: int
    """The state's window of every user: the logs are trimmed to it."""

    def encode(self) -> bytes:
        return orjson.dumps({"actions": list(self.actions), "max_history": self.max_history})

    @classmethod
    def decode(cls, blob: bytes) -> StoreLayout:
        """Parse a stored record; raises :class:`LayoutMismatch` for one this service did not
        write (serving against it could misread every log)."""
        try:
            raw = orjson.loads(blob)
            actions, max_history = raw["actions"], raw["max_history"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            raise LayoutMismatch(f"the store's layout record is unreadable: {error}") from error
        if not (
            isinstance(actions, list)
            and all(isinstance(name, str) for name in actions)
            and isinstance(max_history, int)
            and not isinstance(max_history, bool)
        ):
            raise LayoutMismatch(f"the store's layout record is malformed: {blob[:200]!r}")
        return cls(tuple(actions), max_history)


def reconcile(
    recorded: StoreLayout | None, actions: Sequence[str], max_history: int
) -> StoreLayout:
    """The record after a model with ``actions`` and a worker with ``max_history`` join it.

    A first model writes its own list; a later one appends the names the store lacks. Raises
    :class:`LayoutMismatch` for a model that lacks a name the store holds (its logs may contain
    that action, which the model would misread) or a ``max_history`` other than the store's.
    """
    repeated = sorted({name for name in actions if list(actions).count(name) > 1})
    if repeated:
        raise LayoutMismatch(f"the model's action vocabulary repeats {repeated}")
    if recorded is None:
        return StoreLayout(tuple(actions), max_history)
    if recorded.max_history != max_history:
        raise LayoutMismatch(
            f"the store keeps max_history={recorded.max_history}, this worker would use "
            f"{max_history}: every worker and model version serving one store must share it "
            f"(set IFA_MAX_HISTORY={recorded.max_history}, or give the new value a store of its "
            f"own with another IFA_REDIS_PREFIX)"
        )
    lacking = [name for name in recorded.actions if name not in actions]
    if lacking:
        raise LayoutMismatch(
            f"the model's actions {list(actions)} lack {lacking}, which the store's logs may "
            f"hold (its vocabulary is {list(recorded.actions)}): the model would misread them"
        )
    added = tuple(name for name in actions if name not in recorded.actions)
    return StoreLayout(recorded.actions + added, max_history) if added else recorded


@dataclass(frozen=True)
class ActionMapping:
    """One model's actions against the store's vocabulary: how /events writes a name and how
    the encoder reads a stored index."""

    stored_names: tuple[str, ...]
    """The store's vocabulary as the model was bound to it (stored index -> name)."""
    to_store: dict[str, int]
    """Model action name -> stored index (the model's names are all in the store's list)."""
    from_store: np.ndarray
    """(len(stored_names),) int64: stored index -> the model's index."""

    @classmethod
    def bind(cls, layout: StoreLayout, model_actions: Sequence[str]) -> ActionMapping:
        """The mapping of a model that :func:`reconcile` accepted into ``layout``."""
        model_index = {name: i for i, name in enumerate(model_actions)}
        return cls(
            stored_names=layout.actions,
            to_store={name: layout.actions.index(name) for name in model_actions},
            from_store=np.array([model_index[name] for name in layout.actions], dtype=np.int64),
        )

    @classmethod
    def identity(cls, model_actions: Sequence[str]) -> ActionMapping:
        """A model read against a store whose vocabulary is its own list."""
        return cls.bind(StoreLayout(tuple(model_actions), max_history=0), model_actions)

    def model_actions(self, stored: np.ndarray) -> np.ndarray:
        """(N,) stored indices -> (N,) the model's indices. An index the store's list did not
        hold when the model was bound (a later model appended it), or a negative one (an
        action a seeded world had and no model), is -1: the action field's out-of-vocabulary
        row, as for any action the model does not know."""
        stored = np.asarray(stored, dtype=np.int64)
        if not len(self.from_store):
            return np.full(stored.shape, -1, dtype=np.int64)
        known = (stored >= 0) & (stored < len(self.from_store))
        return np.where(known, self.from_store[np.where(known, stored, 0)], -1)

    def stored_name(self, stored: int) -> str | None:
        """The name of a stored index, None where this mapping does not know it."""
        return self.stored_names[stored] if 0 <= stored < len(self.stored_names) else None
