"""End-to-end task benchmarks for linrec's layers.

* ``bench.tasks.data``: seeded generators for the state-tracking / regular-language suite
  (parity, modular arithmetic, cycle navigation, even pairs, S3 / S5 / A5 word problems).
* ``bench.tasks.models``: a small sequence model (embedding -> [mixer + MLP] blocks -> head) whose
  mixer is any ``linrec.nn`` layer, with stateful decoding and packed (``cu_seqlens``) batches,
  plus the padding-mask <-> ``cu_seqlens`` helpers.
* ``bench.tasks.state_tracking``: train on short sequences, test on longer ones
  (``python -m bench.tasks.state_tracking --help``).
* ``bench.tasks.lm``: a byte-level language model on the Python standard library's sources
  (``python -m bench.tasks.lm --help``).
"""
