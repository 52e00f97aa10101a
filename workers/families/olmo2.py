"""OLMo 2: Llama's projections with RMS norms over the whole query and key projections (`q_norm` over every query
head's rows, `k_norm` over every key head's, before the heads are split), norms after each sub-layer instead of
before it, untied embeddings.

A KV group owns its rows of each norm's weight, so a cut slices them with the projection; and because the norm's
statistic runs over the whole projection, a cut changes the scale the kept heads see. The sliced model's norm runs
over the kept rows, and the masked model (`slicing.masked`) computes the same. A removed sub-layer's zero output
stays zero through the norm after it."""

from .base import Family

FAMILY = Family("olmo2", "Olmo2", "transformers.models.olmo2.modeling_olmo2", projection_norms=True)
