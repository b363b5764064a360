"""RunConfig → Plan → run directory. Pure functions; imports no torch."""

from launcher.plan.plan import PLAN_FILE, Plan, build_plan, default_run_dir, render_files, write_run_dir

__all__ = ["PLAN_FILE", "Plan", "build_plan", "default_run_dir", "render_files", "write_run_dir"]
