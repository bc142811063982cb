"""``toolkit fleet``: the blueprint on many GitLab databases, on the engines operators run.

The ML tables are cell-local, so the milestones run once per database. The toolkit does
not schedule that itself: it reads an inventory (:mod:`.inventory`), plans every database
from one machine (:mod:`.plan`), writes a GitLab CI child pipeline (:mod:`.pipeline`) or
a Kubernetes Indexed Job (:mod:`.k8s`) whose jobs each run one database
(:mod:`.job`), and gathers their artifacts into one report (:mod:`.report`).
"""
