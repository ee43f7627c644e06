"""What a run shows its user: each round's figures (``figures``), the summary table (``summary``) and a model to
take away (``export``)."""
