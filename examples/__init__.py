"""The two models of the forum threads featx began from, made runnable (see ../shared/seeds)."""
