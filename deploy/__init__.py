"""Deployment tooling: TLS certificates and SuperNode keys, per-device data folders, and a
local federation (SuperLink + SuperNodes as separate processes) that runs the app for real.

None of this is imported by the ServerApp or the ClientApp: it sets up the machines they
run on. See docs/DEPLOY.md.
"""
