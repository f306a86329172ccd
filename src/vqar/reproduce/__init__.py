"""Reproducing a paper's numbers from its released weights: the release table (`table`, data in `releases.yaml`),
checked downloads (`download`), resumable sample shards (`samples`), the run (`run`) and its report (`report`)."""
