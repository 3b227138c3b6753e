"""The networks d2f starts from and writes: pretrained UNets and LoRA (``models.py``), a widened ``conv_in``
(``widen.py``), the embedded teachers (``teachers.py``), exports (``export.py``) and sampling them
(``sampling.py``). Needs the ``train`` extra."""
