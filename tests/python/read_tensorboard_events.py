"""Every scalar of a stage folder's TensorBoard event files, read by
TensorBoard's own loader, as one JSON line (tests/tensorboard.rs)."""
import glob, json, sys
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
files = sorted(glob.glob(sys.argv[1] + "/events.out.tfevents.*"))
scalars, versions = [], 0
for path in files:
    for e in LegacyEventFileLoader(path).Load():
        versions += e.file_version == "brain.Event:2"
        for v in e.summary.value:
            scalars.append([v.tag, e.step, v.simple_value])
print(json.dumps({"files": len(files), "versions": versions, "scalars": scalars}))
