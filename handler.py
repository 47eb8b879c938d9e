"""Alias entry point: RunPod's GitHub integration starts ``handler.py``; it serves the same handler."""

from handler_fast import handler, main

__all__ = ["handler"]

if __name__ == "__main__":
    main()
