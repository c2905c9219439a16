"""The VidPrism demo's parts: procedural clips (:mod:`.clips`) and a tiny image-text model
(:mod:`.imagetext`) that stands in for CLIP."""
