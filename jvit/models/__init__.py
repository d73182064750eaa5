"""Model families. Importing a family module registers its variants."""

from jvit.models import hvt, sot, spvit, stvit  # noqa: F401
