"""Former home of the submitit integration, kept so that ``from hpcckpt.submitit import ...`` keeps working.

The code lives in ``hpcckpt.integrations.submitit``; its public names are exported from ``hpcckpt``
(``from hpcckpt import Resumable, submit_chain, stored_result``). This alias warns once and will go in a
later release.
"""

import warnings

from .integrations.submitit import Chain as Chain
from .integrations.submitit import Resumable as Resumable
from .integrations.submitit import Unfinished as Unfinished
from .integrations.submitit import stored_result as stored_result
from .integrations.submitit import submit_chain as submit_chain

warnings.warn(
    "hpcckpt.submitit is now hpcckpt.integrations.submitit; import Resumable, submit_chain, Chain, Unfinished "
    "and stored_result from hpcckpt instead",
    DeprecationWarning,
    stacklevel=2,
)
