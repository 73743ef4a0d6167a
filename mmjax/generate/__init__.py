"""Text generation with memory caches (``python -m mmjax.generate``).

:class:`Decoder` prefills prompts and decodes one token per step on the caches of
:mod:`mmjax.layers.cache`; :func:`generate` samples (greedy, temperature, top-k, top-p),
:func:`beam_search` searches; :func:`load_workdir` rebuilds a trained model, its parameters
and tokenizer from a training workdir.
"""

from mmjax.generate.decoder import Decoder, Hypothesis, beam_search, generate
from mmjax.generate.sampling import Sampling, filter_logits, sample

__all__ = ["Decoder", "Hypothesis", "Sampling", "beam_search", "filter_logits", "generate",
           "sample"]
