"""Evaluation: ``diffalign eval`` (:mod:`.evaluate`), held-out pair accuracies (:mod:`.metrics`), scoring images and
datasets with reward heads (:mod:`.scoring`, ``diffalign score``), the HTML report and the model card."""
