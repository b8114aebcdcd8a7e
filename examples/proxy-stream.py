# fail2ban action: stream bans to one or more f2b-shim proxies.
#
# A thin adapter. The delivery logic is in Go, in "f2b-shim relay", which
# this action starts as its child and feeds on stdin. ban() and unban()
# write their operation to the relay's pipe and return: they wait for no
# sync and no round trip, so a burst goes at fail2ban's own pace. The
# relay appends what comes to the jail's outbox and fdatasyncs it in
# groups (one sync per few hundred operations in a burst), acknowledges
# each group ("ok N"), and streams the outbox to every proxy over one
# kept-open "ssh PROXY f2b-shim stream" session each, in order, at least
# once, with backoff while a proxy is down.
#
# Until the relay acknowledges an operation, this action keeps it: if the
# relay dies (killed, or it restarts itself after an upgrade of its
# binary), the next relay gets every unacknowledged operation again, in
# order, before anything new. If fail2ban-server dies instead, the relay
# still reads everything already written to its pipe, makes it durable,
# and delivers it. A refused operation (a full disk, an unsafe outbox
# directory) is logged as an error by the thread that reads the relay's
# answers.
#
# Install: copy this file to /etc/fail2ban/action.d/proxy-stream.py, and in
# the jail:
#
#   action = proxy-stream.py[port="pop3,pop3s,imap,imaps,sieve", protocol=tcp,
#                            proxies="f2b-proxy, f2b-proxy2"]
#
# Parameters (the names and defaults of proxy-iptables.conf where they are
# the same thing):
#   proxies       ssh destinations of the proxies, comma-separated (f2b-proxy)
#   port          the hooks' ports (ssh); type: multiport, oneport, allports
#   protocol      the hooks' protocols, comma-separated (tcp)
#   chain         the chains the ban chain is hooked into (INPUT)
#   chain_prefix  the ban chain is chain_prefix + the jail's name
#                 (mail-remote-f2b-)
#   blocktype, blocktype6, returntype   as in proxy-iptables.conf
#   ssh_config, ssh_key                 as in proxy-iptables.conf
#   f2b_shim      the f2b-shim binary on this host (/usr/sbin/f2b-shim)
#   outbox_dir    where the jails' outboxes live (/var/lib/fail2ban/f2b-shim)
#   drain         seconds to keep delivering when the jail stops (10)
#
# Works with fail2ban 0.11, 1.0 and 1.1.

import collections
import os
import subprocess
import threading
import time

from fail2ban.server.action import ActionBase


class ProxyStreamAction(ActionBase):

	def __init__(self, jail, name, proxies="f2b-proxy", port="ssh",
			protocol="tcp", chain="INPUT", type="multiport",
			chain_prefix="mail-remote-f2b-",
			blocktype="REJECT --reject-with icmp-port-unreachable",
			blocktype6="REJECT --reject-with icmp6-port-unreachable",
			returntype="RETURN",
			ssh_config="/etc/fail2ban/f2b-shim/ssh_config",
			ssh_key="/etc/fail2ban/f2b-shim/id_ed25519",
			f2b_shim="/usr/sbin/f2b-shim",
			outbox_dir="/var/lib/fail2ban/f2b-shim", drain="10"):
		super(ProxyStreamAction, self).__init__(jail, name)
		jailname = jail.name
		self._drain = float(drain)
		self._args = [
			f2b_shim, "relay",
			"--outbox", os.path.join(outbox_dir, jailname),
			"--chain", chain_prefix + jailname,
			"--proxy", proxies, "--port", port, "--protocol", protocol,
			"--parent", chain, "--type", type,
			"--blocktype", blocktype, "--blocktype6", blocktype6,
			"--returntype", returntype,
			"--ssh-config", ssh_config, "--ssh-key", ssh_key,
			"--drain", "%gs" % self._drain, "--acks", "groups",
		]
		self._relay = None
		self._reader = None
		self._running = False
		self._lock = threading.Lock()
		# Operations written to the relay and not yet acknowledged, in
		# order, and how many of the current relay's lines are.
		self._unacked = collections.deque()
		self._acked = 0
		self._ackLock = threading.Lock()
		self._delay = 1

	def _spawn(self):
		relay = subprocess.Popen(self._args, stdin=subprocess.PIPE,
			stdout=subprocess.PIPE, stderr=subprocess.PIPE,
			universal_newlines=True, bufsize=1, close_fds=True)
		self._relay = relay
		with self._ackLock:
			self._acked = 0
			again = list(self._unacked)
		reader = threading.Thread(target=self._read, args=(relay,), daemon=True)
		reader.start()
		self._reader = reader
		threading.Thread(target=self._watch, args=(relay,), daemon=True).start()
		if again:
			# The last relay died before it acknowledged these: they
			# go first, in order (each is idempotent on the proxies).
			try:
				relay.stdin.write("".join(r + "\n" for r in again))
				relay.stdin.flush()
			except (BrokenPipeError, OSError):
				pass

	def _read(self, relay):
		# "ok N": the relay's first N lines are durable. "error N MSG":
		# its N-th line was refused.
		for line in relay.stdout:
			word, _, rest = line.rstrip("\n").partition(" ")
			n, _, msg = rest.partition(" ")
			try:
				n = int(n)
			except ValueError:
				continue
			with self._ackLock:
				if word == "error" and 0 <= n - self._acked - 1 < len(self._unacked):
					self._logSys.error("f2b-shim relay refused %r: %s", self._unacked[n - self._acked - 1], msg)
				elif word == "ok":
					while self._acked < n and self._unacked:
						self._unacked.popleft()
						self._acked += 1

	def _watch(self, relay):
		# The relay writes "LEVEL: message" lines: what a proxy denied,
		# which proxy is down and why, when it is back.
		for line in relay.stderr:
			level, _, msg = line.rstrip("\n").partition(": ")
			log = {"error": self._logSys.error, "warning": self._logSys.warning}.get(level, self._logSys.info)
			log("%s", msg or level)
		relay.wait()
		if relay.returncode == 5:
			# It cannot start (an unsafe outbox directory, say; its
			# reason is above): what it did not take is refused, and
			# it is tried again less and less often.
			with self._ackLock:
				if self._unacked:
					self._logSys.error("f2b-shim relay could not start: %d operation(s) refused", len(self._unacked))
					self._unacked.clear()
			self._delay = min(self._delay * 2, 60)
		else:
			self._delay = 1
		time.sleep(self._delay)
		with self._lock:
			# A relay that died while the jail runs (killed, crashed,
			# restarted for an upgrade) is started again, so that its
			# outbox goes on to the proxies even when no ban comes.
			if self._running and self._relay is relay:
				self._ensure()

	def _ensure(self):
		if self._relay is not None and self._relay.poll() is None:
			return
		if self._relay is not None:
			self._logSys.warning("f2b-shim relay exited (%s); starting it again", self._relay.returncode)
			if self._reader is not None:
				# Its last acknowledgements first: what it took is not
				# sent again.
				self._reader.join(5)
		self._spawn()

	def _send(self, request):
		with self._lock:
			self._ensure()
			with self._ackLock:
				self._unacked.append(request)
			try:
				self._relay.stdin.write(request + "\n")
				self._relay.stdin.flush()
			except (BrokenPipeError, OSError):
				# The relay is gone: reap it; the next one gets this
				# request and every other one not acknowledged.
				try:
					self._relay.wait(1)
				except subprocess.TimeoutExpired:
					self._relay.kill()
					self._relay.wait()
				self._ensure()

	def _close(self, wait):
		relay, self._relay = self._relay, None
		if relay is None:
			return
		try:
			relay.stdin.close()
		except OSError:
			pass
		try:
			relay.wait(wait)
		except subprocess.TimeoutExpired:
			relay.kill()
			relay.wait()
		if self._reader is not None:
			self._reader.join(5)

	def start(self):
		self._running = True
		# fail2ban bans again from its database after start(): a flush
		# first makes each proxy hold exactly that list, also after a
		# crash or a power loss of the mail host (no stop ran, and the
		# database may have lost the last bans it had made).
		self._send("flush")
		self._send("start")

	def stop(self):
		self._send("stop")
		with self._lock:
			self._running = False
			# The relay takes what is in its pipe, drains for "drain"
			# seconds, then exits.
			self._close(wait=self._drain + 5)
		with self._ackLock:
			if self._unacked:
				self._logSys.error("f2b-shim relay stopped with %d operation(s) not acknowledged", len(self._unacked))
				self._unacked.clear()

	# fail2ban's reload ("fail2ban-client reload", "systemctl reload
	# fail2ban") keeps an action that has clearAllParams and reload, and
	# hands reload the jail's parameters. Without them it makes a second
	# action, whose relay finds the outbox locked, then stops and drops
	# that one: the jail is left with no action and the first relay with
	# no fail2ban to feed it.
	def clearAllParams(self):
		pass

	def reload(self, **kwargs):
		with self._lock:
			new = ProxyStreamAction(self._jail, self._name, **kwargs)._args
			if new != self._args:
				# The chains and hooks on the proxies are the jail's start's;
				# a relay with other parameters would ban into chains that
				# are not there. They change with the jail's restart.
				self._logSys.warning("the action's parameters changed; they take effect when the jail restarts: fail2ban-client reload --restart %s", self._jail.name)
			if self._relay is not None and self._relay.poll() is None and self._replaced():
				# An upgrade replaced the binary: the relay drains and exits
				# (its outbox keeps what it had), and one of the new binary
				# takes over.
				self._logSys.info("%s was replaced; starting its relay again", self._args[0])
				self._close(wait=self._drain + 5)
				if self._running:
					self._spawn()

	def _replaced(self):
		try:
			running = os.stat("/proc/%d/exe" % self._relay.pid)
			installed = os.stat(self._args[0])
		except OSError:
			return False
		return (running.st_dev, running.st_ino) != (installed.st_dev, installed.st_ino)

	def flush(self):
		self._send("flush")
		return True

	def ban(self, aInfo):
		self._send("ban %s" % aInfo["ip"])

	def reban(self, aInfo):
		self.ban(aInfo)

	def unban(self, aInfo):
		self._send("unban %s" % aInfo["ip"])


Action = ProxyStreamAction
