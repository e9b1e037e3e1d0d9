"""The imgsvc benchmark: `make bench`, or `python -m bench --help`.

It starts PostgreSQL, an S3-compatible server (rclone), a static image server and the
service itself (API and one worker) as separate processes on 127.0.0.1, sends CSVs of
real photos through POST /upload, and measures throughput, CPU, memory and API latency;
then it measures the ceiling, the same images through the service's own compress()
in a bare thread pool, and what each encode setting costs. See docs/performance.md.
"""
