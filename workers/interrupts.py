"""Why a job stops early: raised between generations and handled by the driver."""


class Cancelled(Exception):
    """The user asked to cancel; the job ends `cancelled` with its partial front kept."""


class LeaseLost(Exception):
    """Another driver took the job over (our lease lapsed and the job was requeued); stop touching it."""
