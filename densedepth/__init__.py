"""DenseDepth (Alhashim & Wonka, 2018) in Keras 3: the model, its published checkpoints and
prediction. Not built yet: the depth stage arrives with its own issue."""
