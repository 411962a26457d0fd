"""An event made into a signal: the pipeline, the privacy guard, and who it is from."""
