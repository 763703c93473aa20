"""Fast tests of the Helm chart, its generated files, the alerts and the image Dockerfiles."""
