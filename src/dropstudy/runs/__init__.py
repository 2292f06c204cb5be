"""Runs of M >= 1 members from config to finished run directory (`execute`), studies, reruns, resumes."""
