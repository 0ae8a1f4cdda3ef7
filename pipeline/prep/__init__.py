"""The preparation wing: the stages that turn a user's raw pictures into overlay's inputs.

- `dedupe`: one keeper per cluster of near-duplicate backgrounds, resized to --size.
- `foregrounds`: clean RGBA car cutouts from transparent PNGs, or from photos plus masks.
- `flip`: the left-right mirror of every cutout.

Each reads a folder of images and writes a folder of PNGs plus `report.json`. They share one
machinery (`common`): the stage gives a per-item function (`item -> (array, record)`), and the
machinery owns the worker chunks, the output names, the atomic writes, the report and the
bad-input policy. `common` imports no stage.
"""
