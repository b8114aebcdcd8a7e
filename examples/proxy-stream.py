# fail2ban action: stream bans to one or more f2b-shim proxies.
#
# A thin adapter. The delivery logic is in Go, in "f2b-shim relay", which
# this action starts as its child and feeds on stdin: the relay makes each
# ban durable in the jail's outbox (fsync'd) before ban() returns, and
# streams the outbox to every proxy over one kept-open
# "ssh PROXY f2b-shim stream" session each, in order, at least once, with
# backoff while a proxy is down. So ban() and unban() return within a
# fsync whatever state the proxies are in, and no ban is lost.
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
			"--drain", "%gs" % self._drain,
		]
		self._relay = None
		self._running = False
		self._lock = threading.Lock()

	def _spawn(self):
		relay = subprocess.Popen(self._args, stdin=subprocess.PIPE,
			stdout=subprocess.PIPE, stderr=subprocess.PIPE,
			universal_newlines=True, bufsize=1, close_fds=True)
		self._relay = relay
		threading.Thread(target=self._watch, args=(relay,), daemon=True).start()

	def _watch(self, relay):
		# The relay writes "LEVEL: message" lines: what a proxy denied,
		# which proxy is unreachable, what waits in the outbox.
		for line in relay.stderr:
			level, _, msg = line.rstrip("\n").partition(": ")
			log = {"error": self._logSys.error, "warning": self._logSys.warning}.get(level, self._logSys.info)
			log("%s", msg or level)
		relay.wait()
		time.sleep(1)
		with self._lock:
			# A relay that died while the jail runs (killed, crashed) is
			# started again, so that its outbox goes on to the proxies
			# even when no ban comes to restart it.
			if self._running and self._relay is relay:
				self._ensure()

	def _ensure(self):
		if self._relay is not None and self._relay.poll() is None:
			return
		if self._relay is not None:
			self._logSys.warning("f2b-shim relay exited (%s); starting it again", self._relay.returncode)
		self._spawn()

	def _send(self, request):
		with self._lock:
			for attempt in (1, 2):
				self._ensure()
				try:
					self._relay.stdin.write(request + "\n")
					self._relay.stdin.flush()
					reply = self._relay.stdout.readline()
				except (BrokenPipeError, OSError):
					reply = ""
				if reply == "ok\n":
					return
				if reply.startswith("error "):
					raise RuntimeError("f2b-shim relay: %s" % reply[6:].strip())
				# The relay is gone (killed, or it could not start): reap
				# it and start it again, once; its outbox keeps what it had.
				try:
					self._relay.wait(1)
				except subprocess.TimeoutExpired:
					self._relay.kill()
					self._relay.wait()
			raise RuntimeError("f2b-shim relay did not take %r; see the lines above" % request)

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

	def start(self):
		self._running = True
		self._send("start")

	def stop(self):
		self._send("stop")
		with self._lock:
			self._running = False
			# The relay drains for "drain" seconds, then exits.
			self._close(wait=self._drain + 5)

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
