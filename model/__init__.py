"""IFA ranking model: features, networks, training, evaluation and export."""
