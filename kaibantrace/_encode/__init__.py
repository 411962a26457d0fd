"""An event made into a signal: the pipeline, its payload and checks, the JavaScript SDK's
text, the privacy guard, and who it is from."""
