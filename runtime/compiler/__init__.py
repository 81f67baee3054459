"""Build time only, and the one place that imports TensorFlow: SavedModel -> servable."""
