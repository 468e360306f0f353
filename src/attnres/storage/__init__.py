"""What a run directory stores to rebuild a run, and how it is read back.

- :mod:`attnres.storage.config`: the run config (``TrainConfig``), the schema of ``config.json``.
- :mod:`attnres.storage.checkpoint`: ``checkpoint/`` (weights, config, tokenizer, checksums; the
  trainer state as an opaque dict), written atomically and verified on load.
- :mod:`attnres.storage.tokenizer`: the byte and BPE tokenizers and ``tokenizer.json``.

Below ``train``: training writes these files, and ``train --resume``, ``hf`` conversion and
``sample`` read them, without importing ``train``. (Named ``storage`` rather than ``io`` so that
``import io`` in its modules, and in anyone's, is never a question.)
"""
