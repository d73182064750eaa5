"""Model families. Importing a family module registers its variants."""

from jvit.models import sot  # noqa: F401
from jvit.models import stvit  # noqa: F401
