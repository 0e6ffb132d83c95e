"""Custom diffusers pipelines, one per file. Each file imports only torch/diffusers (and the shared
`blood_pipeline_utils`, or the pipeline it derives from, which then ships with it), because it is also shipped as
remote code next to saved weights."""

from .pipeline_bloodgen_ddpm import BloodDDPMPipeline
from .pipeline_bloodgen_gan import BloodGANPipeline
from .pipeline_bloodgen_ldm import BloodLDMPipeline
from .pipeline_bloodgen_vae import BloodVAEPipeline

__all__ = ["BloodDDPMPipeline", "BloodGANPipeline", "BloodLDMPipeline", "BloodVAEPipeline"]
