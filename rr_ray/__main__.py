from rr_ray.cli import entry

entry()
