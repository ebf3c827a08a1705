"""napari-plate-concepts: sparse dictionaries on microscopy foundation-model embeddings of plates.

The core (``plates``, ``embeddings``, ``dictionary``, ``analysis``) never imports Qt or napari;
``viewer`` is the thin napari layer on top.
"""

__version__ = "0.1.0"
