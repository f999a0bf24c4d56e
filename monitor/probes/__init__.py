"""For probe authors: concept specs, the texts they draw on, activations from a model, training and probe cards.

``concepts`` (specs, the built-in pack in ``concept_pack/``) → ``corpora`` (packaged real text) →
``activations`` (run texts through the model with the tap, cached pooled features) → ``train``
(fit, evaluate, write the card) → ``probe`` (the stored artifact, loaded without pickle, and scoring).
"""
