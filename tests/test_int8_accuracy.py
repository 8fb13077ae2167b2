"""The int8 path's accuracy on real weights and real text, measured against the float reference.

The cpu backend quantizes every activation row to 8 bits (and runs every row count through that
one path: batch invariance). Against the NumPy backend on the same GGUF (weights dequantized to
float32, float activations) over >= 400 positions of English prose, the mean KL divergence of the
next-token distributions must be no worse than llama.cpp's on this model (issue 17, measured with
llama.cpp's own int8 path on another text: KL 3.28e-3, top-1 0.963), and perplexity within 2% of
the float reference's.

Both figures move with the text far more than with the kernels (on this model: top-1 0.92 to 0.98
and KL 2.5e-3 to 2.5e-2 over four texts), and a 425-position top-1 has a standard error of ~0.01:
the row kernels and the packed ones, the same int8 rounding summed in another float order, give
top-1 0.972 and 0.955 here. So top-1 is held to 0.95, not to llama.cpp's figure on its own text.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import default_model_gguf

from tinyserve import LLM

LLAMA_CPP_KL = 3.28e-3

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "tried to build a machine that a person could ride without a horse. The first designs had no "
    "pedals at all: the rider sat on a wooden frame between two wheels and pushed against the "
    "ground with both feet. These running machines were popular for a few years, but they were "
    "heavy, and the roads of the time were rough, so most people soon gave them up. Decades later, "
    "a blacksmith or a carriage maker, depending on which story one believes, attached cranks and "
    "pedals to the front wheel. Riders could now move their feet in circles instead of pushing, and "
    "the machine could go faster than a person could run. To go even faster, makers built larger "
    "and larger front wheels, because each turn of the pedals turned the wheel once. The result "
    "was the high wheeler, a tall and elegant machine that was also very dangerous: a rider who hit "
    "a stone could be thrown over the handlebars and land on his head. The safety bicycle solved "
    "this problem. It had two wheels of the same size and a chain that connected the pedals to the "
    "rear wheel, so that a small wheel could still turn quickly. Air-filled tyres, invented a few "
    "years later, made the ride smooth and comfortable. Within a decade, millions of people in "
    "cities and villages were riding bicycles to work, to school and to visit their friends. Women "
    "in particular found a new freedom on two wheels, and the clothes they wore began to change so "
    "that they could ride more easily. Today the bicycle is one of the most efficient machines ever "
    "made: a rider uses less energy to travel a kilometre than a person walking, and far less than "
    "any car. Many cities are building new lanes and parking places for bicycles, and engineers are "
    "still finding ways to make them lighter, stronger and easier to ride up hills. In some "
    "countries more trips are made by bicycle than by car, and children learn to ride almost as "
    "soon as they learn to walk. A good bicycle, looked after with care, can last for a lifetime."
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.real_model
def test_int8_path_is_as_accurate_as_llama_cpp():
    path = default_model_gguf()
    ref = LLM(str(path), backend="numpy", enable_prefix_caching=False)
    ids = ref.tokenizer.encode(TEXT)
    assert len(ids) > 400
    want = _log_softmax(ref.logits(ids))  # (T, V) float reference
    got = _log_softmax(LLM(str(path), backend="cpu", enable_prefix_caching=False).logits(ids))
    kl = (np.exp(want) * (want - got)).sum(axis=-1)  # KL(reference || int8) per position
    top1 = (want.argmax(axis=-1) == got.argmax(axis=-1)).mean()
    nxt = np.asarray(ids[1:])
    ppl = {name: float(np.exp(-lp[np.arange(len(nxt)), nxt].mean()))
           for name, lp in (("float", want[:-1]), ("int8", got[:-1]))}  # fmt: skip
    print(
        f"{len(ids)} positions: mean KL {kl.mean():.3e}, top-1 {top1:.3f}, "
        f"perplexity float {ppl['float']:.3f} int8 {ppl['int8']:.3f}"
    )
    assert kl.mean() <= LLAMA_CPP_KL
    assert top1 >= 0.95
    assert ppl["int8"] <= ppl["float"] * 1.02
