"""Studies of the embedded world: what the README's results and the figures in docs/ come from.

* ``evaluate`` — a hypernet on held-out concepts: inducement, strength response, shape kept, LinEAS beside it;
* ``protocol`` — train and evaluate over several splits, choose on validation concepts, report on test concepts;
* ``baseline`` — converged LinEAS fits (the per-concept yardstick) and their convergence curve;
* ``removal``, ``compose`` — negative strengths and combined concepts;
* ``measure`` — the shared pieces (evaluation set, steered images, held-out loss);
* ``steer`` — images of one concept at several strengths, from the command line.

Each runs as ``python studies/<name>.py --help``. They use the training command (``trainer/``) and the ComfyUI runtime
(``hypertransport_comfy``); nothing in the node pack imports them.
"""
