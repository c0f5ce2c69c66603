/*-------------------------------------------------------------------------
 *
 * callback_center.h
 *		Declarations shared by the files of callback_center.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CALLBACK_CENTER_H
#define CALLBACK_CENTER_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

#define CC_EXTENSION_NAME	"callback_center"
#define CC_VERSION			"0.1.0"
#define CC_WORKER_TYPE		"callback_center worker"

/*
 * State the worker shares with backends.  Backends read it for the status
 * functions and use worker_latch to wake the worker when work commits.
 */
typedef struct CallbackCenterShared
{
	slock_t		mutex;			/* protects every field below */
	pid_t		worker_pid;		/* 0 while no worker runs */
	Latch	   *worker_latch;	/* the worker's proc latch, or NULL */
	TimestampTz worker_started_at;
	uint64		reloads;		/* SIGHUPs processed since start */
	uint64		loops;			/* latch wake-ups (work or timeout) */
	uint64		wakeups;		/* wake requests from backends */
} CallbackCenterShared;

/* callback_center.c */
extern PGDLLIMPORT CallbackCenterShared *cc_shared;
extern char *cc_database;
extern int	cc_poll_interval_ms;
extern bool cc_loaded_at_startup;

extern void cc_require_worker(const char *what);
extern void cc_wake_worker(void);

/* worker.c */
extern PGDLLEXPORT void callback_center_worker_main(Datum main_arg);
extern void cc_register_worker(void);

#endif							/* CALLBACK_CENTER_H */
