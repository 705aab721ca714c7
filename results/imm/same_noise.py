"""Pixel correlation of saved 1-step sample grids that share their noises (same seed, same labels per row), against
meanflow's grid at step 2500: do imm's (and twinflow's) final samples sit at the stage every from-data file passes
through on mnist? Control: the same grid shifted by one row of cells (other labels, other noises).

    python results/imm/same_noise.py          (reads results/<method>/mnist/samples*.png; prints a table)
"""
import os

import numpy as np
from PIL import Image

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GRIDS = [("meanflow", "samples_0002500.png"), ("meanflow", "samples.png"), ("imf", "samples_0002500.png"), ("imf", "samples.png"),
         ("soflow", "samples_0002500.png"), ("soflow", "samples.png"), ("imm", "samples_0002500.png"), ("imm", "samples.png"),
         ("twinflow", "samples_0002500.png"), ("twinflow", "samples.png")]
CELL = 38  # pixels per cell of the 10 x 10 grid in the saved figure


def panel(path):
    """The 1-step panel of a saved grid figure (save_grid's figure, common/eval.py), grey levels."""
    return np.asarray(Image.open(path).convert("L")).astype(float)[32:408, 12:388]


if __name__ == "__main__":
    ref = panel(os.path.join(R, "meanflow", "mnist", "samples_0002500.png"))
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
    print("| grid | step | corr with meanflow@2500 | control (shifted one row) |\n|---|---|---|---|")
    for m, f in GRIDS:
        p = os.path.join(R, m, "mnist", f)
        if os.path.exists(p):
            g = panel(p)
            print(f"| {m} | {f[8:15].lstrip('0') if '_' in f else 'final'} | {corr(ref, g):.3f} | {corr(ref, np.roll(g, CELL, 0)):.3f} |")
