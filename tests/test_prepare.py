"""model.prepare: a team's logs become a world in their own vocabulary, and every malformed
input is an error naming file, column and rows, or a drop the report counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import load_world, spec_for_world
from model.prepare import LogError, encode_attribute, main, prepare, write_example

HEADER = ["request_id", "user_id", "request_time", "item_id", "shown", "click", "cart"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    """Two users, two requests each, three items; clean."""
    items = write_csv(
        tmp_path / "items.csv",
        ["item_id", "category", "brand"],
        [[10, "shoes", "a"], [11, "hats", "b"], [12, "shoes", "c"]],
    )
    impressions = write_csv(
        tmp_path / "impressions.csv",
        HEADER,
        [
            [1, 7, 100, 10, 1, 1, 0],
            [1, 7, 100, 11, 1, 0, 0],
            [2, 8, 150, 12, 1, 1, 1],
            [2, 8, 150, 10, 0, 0, 0],
            [3, 7, 300, 12, 1, 0, 0],
            [3, 7, 300, 11, 1, 1, 1],
        ],
    )
    behaviour = write_csv(
        tmp_path / "behaviour.csv",
        ["user_id", "item_id", "action", "timestamp"],
        [
            [7, 10, "click", 50],
            [7, 11, "impression", 120],
            [8, 12, "cart", 160],
            [7, 10, "cart", 200],
        ],
    )
    return {"impressions": impressions, "behaviour": behaviour, "items": items}


def run(logs: dict[str, Path], out: Path, **options: Any) -> dict[str, Any]:
    return prepare(
        logs["impressions"],
        logs["behaviour"],
        logs["items"],
        out,
        item_attributes=("category", "brand"),
        **options,
    )


def rewrite(path: Path, edit: dict[tuple[int, str], object]) -> None:
    """Change cells (data row, column) of a CSV file."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for (row, column), value in edit.items():
        rows[row][column] = str(value)
    write_csv(path, list(rows[0]), [list(r.values()) for r in rows])


def test_a_clean_log_becomes_a_world_in_its_own_vocabulary(
    logs: dict[str, Path], tmp_path: Path
) -> None:
    report = run(logs, tmp_path / "world")
    world = load_world(tmp_path / "world")
    assert world.actions == ("impression", "click", "cart")
    assert world.objectives == world.actions
    spec = spec_for_world(world)
    assert spec.actions == world.actions
    assert spec.item_names == ("item_id", "category", "brand")
    # Requests in time order; each history is the user's events before the request.
    assert world.requests["request_id"].tolist() == [1, 2, 3]
    histories = [
        world.events["timestamp"][world.history_rows(r)].tolist() for r in range(world.n_requests)
    ]
    assert histories == [[50.0], [], [50.0, 120.0, 200.0]]
    assert world.candidates["y_cart"].tolist() == [0, 0, 1, 0, 0, 1]
    assert world.events["action"].tolist() == [1, 0, 2, 2]  # users 7 then 8, by time
    assert report["dropped"] == {}
    assert report["label_rates"]["click"] == pytest.approx(3 / 5)
    assert json.loads((tmp_path / "world" / "report.json").read_text()) == report
    assert "dropped: nothing" in (tmp_path / "world" / "report.md").read_text()


def test_parquet_inputs_read_like_csv(logs: dict[str, Path], tmp_path: Path) -> None:
    for name in ("impressions", "items"):
        table = pa.csv.read_csv(logs[name])
        logs[name] = tmp_path / f"{name}.parquet"
        pq.write_table(table, logs[name])
    run(logs, tmp_path / "world")
    assert load_world(tmp_path / "world").n_requests == 3


def test_a_missing_column_is_named(logs: dict[str, Path], tmp_path: Path) -> None:
    write_csv(logs["behaviour"], ["user_id", "item_id", "when"], [[7, 10, 5]])
    with pytest.raises(
        LogError, match=r"behaviour.csv: missing column\(s\) \['action', 'timestamp'\]"
    ):
        run(logs, tmp_path / "world")


def test_a_value_of_the_wrong_type_names_column_and_row(
    logs: dict[str, Path], tmp_path: Path
) -> None:
    rewrite(logs["impressions"], {(4, "user_id"): "anna"})
    with pytest.raises(
        LogError, match=r"impressions.csv: column 'user_id' must hold integers.*row 5 \('anna'\)"
    ):
        run(logs, tmp_path / "world")


def test_a_non_binary_label_names_column_and_row(logs: dict[str, Path], tmp_path: Path) -> None:
    rewrite(logs["impressions"], {(2, "cart"): 2})
    with pytest.raises(LogError, match=r"column 'cart' must hold 0 or 1.*row 3 \('2'\)"):
        run(logs, tmp_path / "world")


def test_an_action_without_an_impression_is_refused(logs: dict[str, Path], tmp_path: Path) -> None:
    rewrite(logs["impressions"], {(3, "click"): 1})
    with pytest.raises(LogError, match=r"column 'shown' is 0 where an action column is 1.*row 4"):
        run(logs, tmp_path / "world")


def test_unsorted_behaviour_is_an_error_unless_sorting_is_asked(
    logs: dict[str, Path], tmp_path: Path
) -> None:
    rewrite(logs["behaviour"], {(3, "timestamp"): 10})  # user 7's last row goes back in time
    with pytest.raises(
        LogError, match=r"column 'timestamp' goes back in time.*--sort.*row 4 \('10'\)"
    ):
        run(logs, tmp_path / "world")
    run(logs, tmp_path / "world", sort=True)
    assert load_world(tmp_path / "world").events["timestamp"][:3].tolist() == [10, 50, 120]


def test_duplicate_timestamps_unknown_items_and_actions_are_counted_drops(
    logs: dict[str, Path], tmp_path: Path
) -> None:
    rewrite(logs["behaviour"], {(1, "timestamp"): 50, (2, "action"): "share"})
    rewrite(logs["impressions"], {(5, "item_id"): 99, (1, "item_id"): 10})
    report = run(logs, tmp_path / "world")
    assert report["dropped"] == {
        "impression rows of items missing from the item table": 1,
        "impression rows repeating a candidate of the same request": 1,
        "behaviour rows with an action outside ['impression', 'click', 'cart']": 1,
        "behaviour rows at the same user and timestamp as an earlier row": 1,
    }
    world = load_world(tmp_path / "world")
    assert len(world.events["user_id"]) == 2 and len(world.candidates["item_id"]) == 4
    text = (tmp_path / "world" / "report.md").read_text()
    assert "1 behaviour rows at the same user and timestamp as an earlier row" in text


def test_a_request_logged_with_two_users_is_refused(logs: dict[str, Path], tmp_path: Path) -> None:
    rewrite(logs["impressions"], {(1, "user_id"): 8})
    with pytest.raises(
        LogError, match=r"column 'user_id' differs between rows of the same request_id.*row 2"
    ):
        run(logs, tmp_path / "world")


def test_repeated_item_ids_in_the_item_table_are_refused(
    logs: dict[str, Path], tmp_path: Path
) -> None:
    rewrite(logs["items"], {(2, "item_id"): 10})
    with pytest.raises(LogError, match=r"items.csv: column 'item_id' repeats an item id.*row 3"):
        run(logs, tmp_path / "world")


def test_attributes_past_the_limit_are_hashed_into_stable_buckets() -> None:
    values = [f"seller-{i}" for i in range(50)] + [None]
    codes, buckets, hashed = encode_attribute(values, 8)
    assert hashed and buckets == 8
    assert codes[-1] == -1 and np.all((codes[:-1] >= 0) & (codes[:-1] < 8))
    again, _, _ = encode_attribute(list(reversed(values)), 8)
    assert again[::-1].tolist() == codes.tolist()  # a value's bucket depends on it alone
    small, buckets, hashed = encode_attribute(["b", "a", "b"], 8)
    assert small.tolist() == [1, 0, 1] and buckets == 2 and not hashed


def test_the_command_line_reports_a_clear_error(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite(logs["impressions"], {(0, "shown"): "yes"})
    argv = [
        *("--impressions", str(logs["impressions"]), "--behaviour", str(logs["behaviour"])),
        *("--items", str(logs["items"]), "--out", str(tmp_path / "world")),
    ]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "column 'shown' must hold 0 or 1" in capsys.readouterr().err


def test_the_example_log_prepares_cleanly(tmp_path: Path) -> None:
    write_example(tmp_path / "logs")
    report = prepare(
        tmp_path / "logs" / "impressions.csv",
        tmp_path / "logs" / "behaviour.csv",
        tmp_path / "logs" / "items.csv",
        tmp_path / "world",
        item_attributes=("category", "brand", "seller"),
        max_cardinality=100,
    )
    assert report["actions"] == ["impression", "click", "cart", "purchase"]
    assert report["dropped"] == {}
    hashed = {a["name"]: a["hashed"] for a in report["attributes"]}
    assert hashed == {"category": False, "brand": False, "seller": True}
    rates = report["label_rates"]
    assert rates["click"] > rates["cart"] > rates["purchase"] > 0
