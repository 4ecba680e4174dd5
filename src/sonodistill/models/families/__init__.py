"""Model families: one module per family, each an `Encoder` subclass registered where it is
defined (`@FAMILIES.register("timm")`, `sonodistill.models.specs.FAMILIES`). Nothing is imported
here: the registry imports the family modules on its first lookup."""
