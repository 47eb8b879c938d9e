"""Developer tools outside the worker package and the image: tiny offline models, the demo, test photos."""
