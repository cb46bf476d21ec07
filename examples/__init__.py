"""The two models of the forum threads featx began from, made runnable: the seed toy and the seed ResNet."""
