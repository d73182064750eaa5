"""Model families. Importing a family module registers its variants."""

from jvit.models import deit, hvt, sot, spvit, stvit, swin  # noqa: F401
