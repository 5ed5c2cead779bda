"""Source rewrites: tools that read a .cnn file and write a new one (`convdsl convert`), as
opposed to the passes, which read the checked graph and change nothing."""
