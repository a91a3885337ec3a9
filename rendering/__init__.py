"""Rendering library for radiance fields (spec vision 3.1 and 3.4), pure PyTorch on CPU and CUDA, in nerfacc's
style: flat tensors of samples packed ray by ray plus callbacks, shapes in the docstrings.

- :mod:`rendering.rays`: Blender camera rays, ray / box slab test.
- :mod:`rendering.occupancy`: occupancy-grid estimator (nerfacc 0.5.3 ``OccGridEstimator`` semantics).
- :mod:`rendering.volume`: alpha, transmittance, weights, accumulated color / opacity / depth, background.
- :mod:`rendering.renderer`: sampling + rendering of rays through a field given as callbacks.
- :mod:`rendering.nerfacc_backend`: the same through the optional nerfacc package (CUDA only).

Each fast function has a brute-force twin (``*_reference``) that tests/test_rendering.py compares against.
"""
from rendering.occupancy import OccupancyGrid, march_reference, ray_nears
from rendering.rays import (blender_focal, camera_rays, camera_rays_reference, image_rays, ray_aabb_intersect,
                            ray_aabb_intersect_reference)
from rendering.renderer import BACKENDS, render_rays
from rendering.volume import (accumulate_along_rays, exclusive_sum_packed, render_transmittance_from_density,
                              render_visibility_from_density, render_weight_from_density, rendering,
                              rendering_reference, render_weight_reference)

__all__ = ["OccupancyGrid", "march_reference", "ray_nears", "blender_focal", "camera_rays", "camera_rays_reference",
           "image_rays", "ray_aabb_intersect", "ray_aabb_intersect_reference", "BACKENDS", "render_rays",
           "accumulate_along_rays", "exclusive_sum_packed", "render_transmittance_from_density",
           "render_visibility_from_density", "render_weight_from_density", "rendering", "rendering_reference",
           "render_weight_reference"]
