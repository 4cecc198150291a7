"""Vision experts: fitting them on known-good samples and loading them back.

- :mod:`.fit`: the verb ``fit_expert`` (one anomalib model, or one per product group);
- :mod:`.single`: fitting one anomalib model and calibrating it on held-out normals;
- :mod:`.grouped`: per-group experts and ensembles (``ensemble_experts``); :mod:`.combined`: how their
  members' outputs combine;
- :mod:`.select`: ``select_experts``, candidates fitted and chosen on validation anomalies (labelled or
  synthetic: :mod:`.validation`, :mod:`.synthetic`), the optional supervised head (:mod:`.head`) and the recorded
  table (:mod:`.selection_report`);
- :mod:`.clip`: the zero/few-shot CLIP expert (``create_clip_expert``);
- :mod:`.record`: the :class:`Expert` record and the explicit loader table (run method -> model);
- :mod:`.export` / :mod:`.importing`: ``export_expert`` (to the line) and ``import_expert`` (anomalib models
  trained elsewhere);
- :mod:`.fits`: each fit's own folder, switched to only when the fit has succeeded.

Example:
    >>> expert = fav.fit_expert(ds.match_tags("good"), model="padim", key="padim")
    >>> fav.load_expert(ds, "padim").load("cpu")
"""

from .clip import create_clip_expert
from .combined import ALL, CompositeExpert
from .export import export_expert
from .fit import fit_expert
from .fits import FitFolder, remove_orphan_fits
from .grouped import ensemble_experts, fit_grouped_expert, group_fields
from .importing import import_expert
from .record import EXPERT_LOADERS, Expert, list_experts, load_expert
from .single import calibrate_expert, decodable_images, fit_single_expert, holdout_split

__all__ = ["export_expert", "import_expert", "ALL", "EXPERT_LOADERS", "CompositeExpert", "Expert", "FitFolder", "calibrate_expert", "create_clip_expert",
           "decodable_images", "ensemble_experts", "fit_expert", "fit_grouped_expert", "fit_single_expert",
           "group_fields", "holdout_split", "list_experts", "load_expert", "remove_orphan_fits"]
