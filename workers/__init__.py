"""The compute side: the driver, Ray evaluators, model loading, surgery, training and metrics."""
