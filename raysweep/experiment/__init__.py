"""One trial of the experiment: the spec it runs, stored checkpoints, the metrics and the trial function itself."""
