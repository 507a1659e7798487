"""Few-shot text classification on pre-trained Hugging Face sentence encoders (issue 14).

Modules, each using only those before it:

* :mod:`~kshot.text.encoder`: :class:`SentenceEncoder` (transformers + sentence-transformers
  pooling; cut between layers; identified by the SHA-256 of its files).
* :mod:`~kshot.text.cache`: encodings of text lists, computed once, in the cache directory.
* :mod:`~kshot.text.data`: :class:`EncodedTexts` (a text dataset's examples as encoder
  outputs), the standard released-split setting, encoder records for checkpoints.
* :mod:`~kshot.text.models`: the ``identity`` and ``text_top`` backbones.
* :mod:`~kshot.text.learners`: ``finetune`` (a linear head fitted on the support set), presets.
* :mod:`~kshot.text.intent`: the standard intent-detection evaluation (all intents, K shots).
* :mod:`~kshot.text.reading`: a user's CSV / text files for ``kshot adapt``.

``transformers`` is imported only when an encoder is built (``pip install "kshot[text]"``).
"""

from kshot.text.cache import EncodingCache
from kshot.text.data import (EncodedTexts, encode_dataset, encode_texts, encoder_for_record, get_encoder,
                             released_task, same_encoder, text_backbone_options)
from kshot.text.encoder import EncoderRecord, Pooling, SentenceEncoder
from kshot.text.intent import IntentResult, evaluate_released, t_interval
from kshot.text.learners import DEFAULT_ENCODER, FineTune, frozen_text_learner
from kshot.text.models import TopLayers
from kshot.text.reading import TextInputFormat, Utterances, read_utterances

__all__ = ["DEFAULT_ENCODER", "EncodedTexts", "EncoderRecord", "EncodingCache", "FineTune", "IntentResult",
           "Pooling", "SentenceEncoder", "TextInputFormat", "TopLayers", "Utterances", "encode_dataset",
           "encode_texts", "encoder_for_record", "evaluate_released", "frozen_text_learner", "get_encoder",
           "read_utterances", "released_task", "same_encoder", "t_interval", "text_backbone_options"]
