"""`ray job submit --working-dir . -- python jobs/code_unlearn.py --config CONFIG --set run.dir=s3://...`"""

from rr_ray.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("code"))
