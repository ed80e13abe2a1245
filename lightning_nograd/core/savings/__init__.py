"""The savings pipeline, in the order it runs: an epoch's measures, the recorded step, its replay with
gradients on and off, the replays' time budget, and the estimate of what ``no_grad`` saved."""
