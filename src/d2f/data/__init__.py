"""What goes in, read top to bottom as one pipeline: images and the image sources (``images.py``), captioned
image folders (``captions.py``), the latents file a pipeline's own VAE and text encoders make of them
(``encode.py``), the data set a run trains on, from any source (``datasets.py``), and reflow pairs
(``pairs.py``). Needs the ``train`` extra."""
