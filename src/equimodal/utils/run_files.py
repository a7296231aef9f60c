"""The names of the files in a run folder, in one place, below every layer that reads or writes them.

:class:`equimodal.engine.run_folder.RunFolder` reads and writes them; a library module that reads a run
folder written by ``equimodal train`` (``umt``'s teachers) takes the names from here.
"""

from __future__ import annotations

CONFIG = "config.yaml"
"""The resolved config, written when the run starts."""
METRICS = "metrics.csv"
"""One row per finished epoch."""
STEPS = "steps.csv"
"""The balancer's statistics every ``train.stats_every`` optimizer steps."""
SUMMARY = "summary.json"
"""The selected epoch's figures; written last, so it marks a finished run."""
PREDICTIONS = "predictions.npz"
"""The selected epoch's val and test logits and labels, the training label counts, the class names."""
LAST = "last.pt"
"""The checkpoint to resume from."""
BEST = "best.pt"
"""The selected epoch's model and balancer."""
SKIPPED = "skipped.csv"
"""The dataset rows skipped as unusable (only when there were any)."""
CURVES = "curves.png"
"""The learning curves ``equimodal report --out`` draws by default."""
REPORT = "report.html"
"""The page ``equimodal report`` writes by default."""
TENSORBOARD = "tensorboard"
"""The folder of TensorBoard event files (``train.tensorboard=true``)."""

RUN_OUTPUTS = (LAST, BEST, METRICS, STEPS, SUMMARY, PREDICTIONS, SKIPPED, CURVES, REPORT)
"""What a run (and ``equimodal report`` on it) writes into its folder, besides its config and
TensorBoard's folder."""
