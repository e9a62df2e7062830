"""python -m beit_scale.scaling.study STUDY.yaml [...]: the same as launch/scaling_study.py."""
import sys

from beit_scale.scaling.study.runner import main

sys.exit(main())
