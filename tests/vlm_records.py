"""Random preference records for the collator, packing and adapter tests: noise images of varied
sizes, and texts of varied lengths from the shapes vocabulary (some answers empty)."""

import numpy as np
from PIL import Image

WORDS = ("red green blue yellow circle circles square squares triangle two three one top bottom left right "
         "center yes no the is there a of in image").split()


def make_records(n: int, seed: int = 0, answer_words=(0, 12), question_words=(2, 10), image_side=(16, 64)):
    """``n`` records; word counts and image sides are drawn uniformly in the given inclusive /
    half-open ranges."""
    rng = np.random.default_rng(seed)

    def image():
        h, w = (int(x) for x in rng.integers(*image_side, size=2))
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def text(lo_hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo_hi[0], lo_hi[1] + 1))))

    return [
        dict(image=image(), contrast_image=image(), question=text(question_words).capitalize() + "?",
             chosen=text(answer_words), rejected=text(answer_words), contrast_chosen=text(answer_words))
        for _ in range(n)
    ]
